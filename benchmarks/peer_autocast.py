"""The peer's training step (see ../shared/bench/peer_lucidrains.py) under bf16 autocast.

lucidrains' trainer offers mixed precision (`amp=True`, through accelerate), so a comparison with
our bf16 step is fair only against the peer in mixed precision too. Same network, diffusion,
optimizer, clipping and timing as peer_lucidrains.py, with the forward and loss inside
torch.autocast(bfloat16); prints the same JSON line.

    python benchmarks/peer_autocast.py --peer_script .gpu_kit/peer_lucidrains.py --batch 128
"""
import argparse
import json
import os
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--peer_script", required=True, help="path to peer_lucidrains.py")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--mults", default="1,2,2,2")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(a.peer_script)))
    from peer_lucidrains import _torchvision_stand_in  # its workaround for a broken torchvision

    _torchvision_stand_in()
    import torch
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = Unet(dim=a.dim, dim_mults=tuple(int(m) for m in a.mults.split(",")), flash_attn=False)
    diff = GaussianDiffusion(model, image_size=a.size, timesteps=1000,
                             objective="pred_noise", beta_schedule="linear").to(dev)
    opt = torch.optim.Adam(diff.parameters(), lr=2e-4, betas=(0.9, 0.99))
    x = torch.rand(a.batch, 3, a.size, a.size, device=dev)

    def step():
        with torch.autocast(device_type=dev, dtype=torch.bfloat16):
            loss = diff(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diff.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss.item()

    step()  # warm-up
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    print(json.dumps({
        "peer": "denoising_diffusion_pytorch", "precision": "bf16 autocast", "device": dev,
        "params_M": round(sum(q.numel() for q in model.parameters()) / 1e6, 2),
        "batch": a.batch, "size": a.size, "step_s": round(dt, 4),
        "img_per_s": round(a.batch / dt, 2),
    }))


if __name__ == "__main__":
    main()
