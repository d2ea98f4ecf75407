"""Task metrics (caption exact match, BLEU-4, CIDEr; VQA accuracy) and model evaluation."""
