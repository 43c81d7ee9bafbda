"""From sources to per-process batches: corpora, TFDS datasets, the tokenizer, packing, position."""
