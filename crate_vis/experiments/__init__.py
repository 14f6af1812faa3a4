"""Jobs that combine the layers below into a result on disk: segmenting a dataset, attention and head figures,
white-box analyses, scoring, evaluation, and the emergence experiments. The command line only parses arguments
for these functions.
"""
