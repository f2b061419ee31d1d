"""FBK-fairseq Conformer models (base, FAMA) loaded from real checkpoints without fairseq."""
from models.conformer.adapter import FBKConformerModel, load_fbk_model
from models.conformer.checkpoint import load_conformer, load_fairseq_checkpoint, load_hf_fama, save_fbk_checkpoint
from models.conformer.model import ConformerConfig, ConformerModel

__all__ = ["FBKConformerModel", "load_fbk_model", "load_conformer", "load_fairseq_checkpoint", "load_hf_fama",
           "save_fbk_checkpoint", "ConformerConfig", "ConformerModel"]
