"""The experiments' data: GLUE (``tasks``: the task registry; ``tsv``: raw rows from the hub
or GLUE's TSV files; ``glue``: splits, tokenisers and T5 tensors, with the image loaders
re-exported), CIFAR-100 and digits (``images``), and the training runner's splits and batches
(``splits``)."""
