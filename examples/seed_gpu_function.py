"""Ray's "Using Ray with GPUs" page, remote functions, with one changed line.

The page's code, as written for Ray, runs here with ``import dask_gpuresources as ray``: a
local Dask cluster stands for a machine with 4 GPUs (declared, so no GPU is needed), and each
call of ``gpu_method`` owns one of them while it runs.

    python examples/seed_gpu_function.py
"""

import dask_gpuresources as ray

ray.init(num_gpus=4)


@ray.remote(num_gpus=1)
def gpu_method():
    return "This function is allowed to use GPUs {}.".format(ray.get_gpu_ids())


# One call, then four: each owns a device while it runs (quick calls may reuse one).
print(ray.get(gpu_method.remote()))
for line in ray.get([gpu_method.remote() for _ in range(4)]):
    print(line)

# Asking for more GPUs than the machine has is an error, raised at once.
try:
    gpu_method.options(num_gpus=5).remote()
except ray.InfeasibleRequestError as err:
    print("As promised, an error:", err)

ray.shutdown()
