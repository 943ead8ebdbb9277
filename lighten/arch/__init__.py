"""Architecture surgery: BN folding (used by quant.ptq; later by arch.* steps)."""

from lighten.arch.fold import FoldReport, fold_batchnorm, fold_batchnorm_report

__all__ = ["FoldReport", "fold_batchnorm", "fold_batchnorm_report"]
