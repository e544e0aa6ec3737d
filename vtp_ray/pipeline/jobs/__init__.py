"""The Ray Data jobs, one module each (tokenize, lightningdit, evaluate, zeroshot, decode): its model stage (a
``worker.ModelStage`` subclass) and its writer on the driver; the sources, the preprocess stage, placement and the run
are the pipeline's.
"""
