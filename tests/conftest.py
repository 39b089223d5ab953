"""Test setup: CPU only, 32 fake devices (an 8x4 mesh), set before JAX is imported anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=32"
# The suite's programs are tiny and mostly run once or twice each: its time is XLA:CPU compiles,
# of which LLVM's optimisation passes are about a third. The tests check values, never speed (at
# the same tolerances; XLA:CPU's fast-math is off either way). The scripts the tests start for
# many steps or requests drop it (script_runs.py): those run faster at XLA's default level.
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()
# tests never reach a model hub or dataset hub (lm-eval's local task YAMLs read local files)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent XLA compilation cache for the whole run, shared with the scripts the tests start
# in subprocesses (they inherit the environment): the same model compiled again -- a resumed run,
# a second process, another test on the same shapes -- is read back instead of recompiled. A fresh
# temporary folder per run, removed at exit: nothing outlives the session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="glm_jax_xla_cache_")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# The heaviest files first: `pytest -n 2 --dist loadfile` hands files to the two workers in this
# order (pytest_configure turns off xdist's own reordering, by test count), so the long ones start
# at once and the short ones fill in around them.
HEAVY_FIRST = (
    "test_multiprocess.py",
    "test_sharding.py",
    "test_train.py",
    "test_dpo.py",
    "test_ppo.py",
    "test_peft.py",
    "test_serve.py",
    "test_inference_mesh.py",
    "test_engine_mesh.py",
    "test_scale.py",
    "test_pipeline_stages.py",
    "test_finetune.py",
    "test_tpu_attention.py",
    "test_quant.py",
    "test_topology.py",
    "test_optim.py",
    "test_model.py",
    "test_released.py",
    "test_harness.py",
    "test_evaluate.py",
    "test_layers.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.7
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))
