"""Correctness and timing of the fused kernel vs torch on CUDA, over SUB choices (device machine)."""
import sys
import torch
from triton.testing import do_bench

from canvaswatch.server.bottleneck import fused_triton as dt
from canvaswatch.server.bottleneck.projection import Projection

torch.manual_seed(0)
dev = "cuda"
for L, d in ((256, 640), (1024, 640), (256, 2816), (1024, 2816)):
    V = 262144
    E = (torch.randn(V, d, device=dev) * 0.03).to(torch.bfloat16)
    H = torch.randn(L, d, device=dev).to(torch.bfloat16)
    bare = do_bench(lambda: H @ E.T)
    line = f"L={L} d={d}: bare {bare:.3f} ms"
    for sub in (16, 32, 64):
        dt.SUB = sub
        for proj in (Projection(), Projection(softcap=30.0)):
            r = dt.fused_topk(H, E, 8, proj)
            ref = proj.apply(H.double() @ E.double().T)
            rv, ri = torch.topk(ref, 8, dim=1)
            assert torch.equal(r.ids.long(), ri), (sub, proj)
            assert (r.log_z.double() - torch.logsumexp(ref, 1)).abs().max() < 1e-4
        fused = do_bench(lambda: dt.fused_topk(H, E, 8))
        line += f" | SUB={sub} fused {fused:.3f} ({fused/bare:.2f}x)"
    print(line, "| config", dt._project_reduce.best_config, flush=True)
