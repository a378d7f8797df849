"""DDPM's CIFAR-10 recipe (Ho et al. 2020): 35.7M-parameter U-Net, 800k steps at batch 128.

    python -m ddpm_jax.main --config configs/cifar10.py --workdir runs/cifar10

Paper: FID 3.17 after 800k steps on a TPU v3-8 (about 10.6 hours at 21 steps/s). Use
`--config.model.dtype=bfloat16` on GPU/TPU.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.source = "tfds"
    config.data.name = "cifar10"
    config.data.eval_split = "test"
    config.data.num_eval_examples = 512
    config.data.image_size = 32
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.diffusion.beta_schedule = "linear"
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.training.batch_size = 128
    config.training.num_train_steps = 800_000
    config.training.ema_decay = 0.9999
    return config
