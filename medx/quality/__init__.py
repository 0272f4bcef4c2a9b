"""Image-quality assessment: handcrafted features, synthetic degradations, QC scoring."""
