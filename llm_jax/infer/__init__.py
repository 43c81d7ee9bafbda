"""Using a trained model: generation and masked-LM predictions."""
