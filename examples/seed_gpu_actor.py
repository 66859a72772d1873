"""Ray's "Using Ray with GPUs" page, actors, with one changed line.

An actor that asks for a GPU holds it for its whole life: while the four actors below live,
every device of the 4-GPU machine is theirs, and a fifth waits until one is killed.

    python examples/seed_gpu_actor.py
"""

import dask_gpuresources as ray

ray.init(num_gpus=4)


@ray.remote(num_gpus=1)
class GPUActor(object):
    def __init__(self):
        # (The page returns this string from __init__; Python allows only None there, so the
        # actor keeps it and a method returns it.)
        self.message = "This actor is allowed to use GPUs {}.".format(ray.get_gpu_ids())

    def hello(self):
        return self.message


actors = [GPUActor.remote() for _ in range(4)]
for line in ray.get([a.hello.remote() for a in actors]):
    print(line)
print("GPUs free while the four actors live:", ray.available_resources()["GPU"])

fifth = GPUActor.remote()
ready, _ = ray.wait([fifth.hello.remote()], timeout=1)
print("A fifth actor waits for a device:", not ready)
ray.kill(actors[0])
print("After killing the first, the fifth says:", ray.get(fifth.hello.remote()))

try:
    GPUActor.options(num_gpus=8).remote()
except ray.InfeasibleRequestError as err:
    print("As promised, an error:", err)

ray.shutdown()
