"""torch 2.13: donated_buffer=False at compile time, and the backward still refuses retain_graph=True."""
import torch
import torch._functorch.config as fconf
from torch._inductor.compile_fx import compile_fx


def backend(gm, example_inputs):
    with fconf.patch(donated_buffer=False):  # only while compiling, as a library that wraps compile_fx would
        return compile_fx(gm, example_inputs)


def f(x, w):
    return (x @ w).relu().sum()


x = torch.randn(8, 16)
w = torch.randn(16, 16, requires_grad=True)
torch._dynamo.mark_dynamic(x, 0)  # dynamic: the backward is compiled with the forward
loss = torch.compile(f, backend=backend)(x, w)
loss.backward(retain_graph=True)
print("retain_graph=True worked")
