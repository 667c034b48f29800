"""Load an AOTInductor package and run it, in a fresh process that does not import adapt_compiler.

    python aoti_runner.py PACKAGE.pt2 JOB.pt OUT.pt

JOB.pt (torch.save) holds {"inputs": [(args, kwargs), ...], "swap": {fqn: tensor} | None}. OUT.pt gets
{"before": [[flat output tensors] per input], "after": [...] (after load_constants(swap)) | None,
"fqns": the package's constant FQNs, "imported": modules of interest that got imported}.
"""

import sys

import torch
import torch._inductor
from torch.utils import _pytree as pytree


def main(package, job_path, out_path):
    job = torch.load(job_path, weights_only=True)
    runner = torch._inductor.aoti_load_package(package)

    def run_all():
        outs = []
        with torch.no_grad():
            for args, kwargs in job["inputs"]:
                outs.append([t for t in pytree.tree_leaves(runner(*args, **kwargs)) if isinstance(t, torch.Tensor)])
        return outs

    result = {"before": run_all(), "after": None, "fqns": list(runner.get_constant_fqns())}
    if job.get("swap"):
        runner.load_constants(job["swap"], check_full_update=False)
        result["after"] = run_all()
    result["imported"] = sorted(m for m in ("adapt_compiler", "transformers", "peft") if m in sys.modules)
    torch.save(result, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
