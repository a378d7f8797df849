"""A small model that draws recognisable faces within minutes on a laptop CPU.

    python -m ddpm_jax.main --config configs/quickstart.py --workdir runs/quickstart

Data: the 100 real 25x25 face crops from LFW that scikit-image ships (no download), at 32x32.
Network: 2.6M parameters. Expect about 10-15 minutes on a 2-core CPU for 3,000 steps.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.image_size = 32
    config.data.num_eval_examples = 8
    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.0  # 92 images: dropout only slows it down at this length
    config.diffusion.beta_schedule = "cosine"  # better samples at low resolution
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.training.batch_size = 32
    config.training.num_train_steps = 3000
    config.training.ema_decay = 0.995  # a short run needs a short EMA horizon
    config.training.log_every_steps = 50
    config.training.eval_every_steps = 500
    config.training.checkpoint_every_steps = 500
    config.training.sample_every_steps = 1000
    config.training.num_grid_samples = 16
    config.sampling.sampler = "ddim"
    config.sampling.num_steps = 100
    config.sampling.num_samples = 16
    return config
