"""Faces at 64x64: CelebA through tfds, or your own folder of portrait photos.

    python -m ddpm_jax.main --config configs/faces.py            # works in runs/faces

Your own photos (any size and format; faces roughly centred):

    python -m ddpm_jax.main --config configs/faces.py --workdir runs/myfaces \
        --config.data.source=folder --config.data.path=/path/to/photos

Portraits are taller than wide: `--config.data.image_size="(80,64)"` (height, width) keeps more of
each than the centred square. A folder holds out 5% of its photos for the validation loss (at
most num_eval_examples), and trains even when it has fewer photos than a batch.

TFDS celeb_a downloads from Google Drive, which often refuses on quota; then download it by hand
and pass --config.data.data_dir, or use a folder. The network is DDPM's CelebA-HQ/LSUN layout
scaled to 64x64 (ch 128, ch_mult (1, 1, 2, 2, 4), attention at 16x16; 70M parameters). On one
modern GPU in bfloat16 a usable model takes about a day; with ~1,000 photos expect a model that
memorises, so stop early and watch the sample grids.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.source = "tfds"
    config.data.name = "celeb_a"
    config.data.eval_split = "validation"
    config.data.num_eval_examples = 256
    config.data.image_size = 64
    config.model.ch = 128
    config.model.ch_mult = (1, 1, 2, 2, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0
    config.training.batch_size = 64
    config.training.num_train_steps = 500_000
    config.training.sample_every_steps = 5000
    config.sampling.sampler = "ddim"
    config.sampling.num_steps = 250
    return config
