"""Ray's TensorFlow-in-a-GPU-actor example, in today's TensorFlow 2 (Keras, no tf.Session).

The actor holds one GPU for its whole life and keeps a Keras model in it: each ``train`` call
continues where the last one stopped. It runs isolated (the default for GPU actors), in a
process whose ``CUDA_VISIBLE_DEVICES`` is its device, so TensorFlow sees that device only;
killing the actor ends that process and gives its GPU memory back. With ``tensorflow-cpu``
TensorFlow sees no GPU and trains on the CPU, and the printout says so.

    pip install -e ".[tensorflow]" && python examples/tensorflow_actor.py
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

import dask_gpuresources as ray

ray.init(num_gpus=2)


@ray.remote(num_gpus=1)
class GPUActor(object):
    def __init__(self, seed):
        import numpy as np
        import tensorflow as tf  # loads with CUDA_VISIBLE_DEVICES = this actor's device

        self.gpu_ids = ray.get_gpu_ids()
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(1024, 8)).astype("float32")
        self.y = self.x @ rng.normal(size=(8, 1)).astype("float32") + 0.1
        tf.keras.utils.set_random_seed(seed)
        self.model = tf.keras.Sequential(
            [
                tf.keras.Input(shape=(8,)),
                tf.keras.layers.Dense(16, activation="relu"),
                tf.keras.layers.Dense(1),
            ]
        )
        self.model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="mse")
        self.devices = [d.name for d in tf.config.list_physical_devices("GPU")]

    def train(self, epochs):
        history = self.model.fit(self.x, self.y, epochs=epochs, batch_size=64, verbose=0)
        return history.history["loss"][-1]

    def describe(self):
        return self.gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"), self.devices


actors = [GPUActor.remote(seed) for seed in range(2)]
for actor in actors:
    ids, visible, seen = ray.get(actor.describe.remote())
    where = (
        f"TensorFlow sees {len(seen)} GPU(s): {seen}"
        if seen
        else "TensorFlow sees no GPU (tensorflow-cpu), so it trains on the CPU"
    )
    losses = ray.get([actor.train.remote(10) for _ in range(3)])  # one model, trained on
    print(
        f"Actor with GPUs {ids} runs with CUDA_VISIBLE_DEVICES={visible}; {where}; "
        f"loss after each round: {', '.join(f'{v:.3f}' for v in losses)}"
    )
    ray.kill(actor)

# kill() returns at once, as in Ray; the devices come free once each actor's process is
# gone (at most gpuresources.isolation.kill-grace-period later).
deadline = time.monotonic() + 30
while ray.available_resources()["GPU"] < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
print("GPUs free after killing the actors:", ray.available_resources()["GPU"])
ray.shutdown()
