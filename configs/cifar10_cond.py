"""Class-conditional CIFAR-10 with classifier-free guidance: DDPM's recipe plus a label embedding.

    python -m ddpm_jax.main --config configs/cifar10_cond.py                   # runs/cifar10_cond
    python -m ddpm_jax.main --config configs/cifar10_cond.py --mode=sample \
        --config.sampling.label=3                                             # cats only

The network is configs/cifar10.py's (35.7M parameters) plus an embedding of the 10 classes and
the null class (11 x 512 = 5,632 parameters), added to the time embedding. During training 10% of
the labels are dropped to the null class (Ho & Salimans 2022 found 0.1 to 0.2 best), so the one
network is both the conditional and the unconditional model. Samples are guided with
w = guidance_scale: eps = eps_uncond + w (eps_cond - eps_uncond). Ho & Salimans write
(1 + w') eps_cond - w' eps_uncond, so their w' is our w - 1. They found small w' (about 0.1 to
0.3) best for FID on CIFAR-10, larger w' trading diversity for Inception score; 1.3 here is their
w' = 0.3, a starting point, not a value tuned or an FID measured with this code (none has been
yet). `--mode=eval` draws the classes in turn (uniform labels) with this guidance.
"""

from configs import cifar10


def get_config():
    config = cifar10.get_config()
    config.model.num_classes = 10  # tfds cifar10's 'label' feature (data.label_key)
    config.model.label_dropout = 0.1
    config.sampling.guidance_scale = 1.3
    return config
