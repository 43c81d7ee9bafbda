"""The networks: layers, the decoder built from them, what each family is, and their FLOPs."""
