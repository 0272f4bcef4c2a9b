"""How a training run is carried out beyond Lightning's defaults: checkpoint writing
(`checkpoint_io`), resuming a crashed run exactly (`resume`), and mixed precision per GPU
(`precision`)."""
