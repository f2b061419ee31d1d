"""The paper's method as pure computation: tensors in, tensors out (no file I/O, no Ray)."""
from xai_core.compare import (POOLING_METHODS, aggregate_attention, context_mixing_gap, correlate,
                              normalise_attention, normalise_saliency, paired_min_max, paper_tables,
                              pearson, pool_input_saliency, single_mean_std, table_aggregation,
                              table_grid, table_layers, table_p_sweep)
from xai_core.masks import (level_ranges, mask_key, occlusion_masks, segment_counts, split_masks,
                            superpixels, uniform_bits)
from xai_core.metrics import (PERCENTAGES, SIZE_THRESHOLDS, deletion_auc, deletion_inputs, deletion_order,
                              encoder_deletion_masks, frame_order, sentence_map, size_curve, size_score,
                              upsample_steps, wer_max)
from xai_core.saliency import (MAX_EXACT_BATCH, SaliencyEstimate, choose_batch_size, encoder_saliency,
                               input_saliency, kl_scores)

__all__ = [name for name in dir() if not name.startswith("_")]
