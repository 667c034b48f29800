import sys, time, torch
sys.path.insert(0, "tests")
from models import tiny_llama, tiny_mistral, token_batch
from adapt_compiler.capture import capture
import cProfile, pstats
for mk in (tiny_llama, tiny_mistral):
    m = mk(); b = token_batch(labels=True)
    capture(m, (), b, True)
    t = time.perf_counter(); capture(m, (), b, True); print(mk.__name__, "train", time.perf_counter() - t)
    t = time.perf_counter(); capture(m, (), b, False); print(mk.__name__, "eval", time.perf_counter() - t)
m = tiny_mistral(); b = token_batch(labels=True)
cProfile.run("capture(m, (), b, True)", "/tmp/prof_cap.out")
