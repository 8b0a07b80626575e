"""Preference optimisation and reward learning from demonstrations: DPO, MRPO, IRFT, RFT (losses, pairs, pipeline)."""
