"""Drop-in integrations with other trainers. Import the submodule you need; each imports its own framework.

    rpo_fast.integrations.trl         RPOFastDPOTrainer / patch_dpo_trainer for trl.DPOTrainer
    rpo_fast.integrations.hf_trainer  RPOTrainerMixin / rpo_compute_loss for transformers.Trainer
    rpo_fast.integrations.padded      pack_padded_pairs: padded [2B, L] batches -> rpo_fast's packed form
"""
