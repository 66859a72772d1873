"""Ray's TensorFlow-in-a-GPU-task example, in today's TensorFlow 2 (Keras, no tf.Session).

Each task asks for one GPU and trains a small Keras model on synthetic data. It runs isolated
(the default for GPU tasks): its process starts with ``CUDA_VISIBLE_DEVICES`` set to exactly
its device, so TensorFlow sees that device only; the page's line that sets the variable by
hand is no longer needed. With ``tensorflow-cpu`` TensorFlow sees no GPU and trains on the
CPU, and the printout says so; on a GPU machine the same file trains on the GPUs.

    pip install -e ".[tensorflow]" && python examples/tensorflow_task.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

import dask_gpuresources as ray

ray.init(num_gpus=2)


@ray.remote(num_gpus=1)
def gpu_method(epochs, seed):
    import numpy as np
    import tensorflow as tf  # loads with CUDA_VISIBLE_DEVICES = this task's device

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1024, 8)).astype("float32")
    y = x @ rng.normal(size=(8, 1)).astype("float32") + 0.1

    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential(
        [
            tf.keras.Input(shape=(8,)),
            tf.keras.layers.Dense(16, activation="relu"),
            tf.keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="mse")
    history = model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return {
        "gpu_ids": ray.get_gpu_ids(),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "tensorflow_gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "loss": (history.history["loss"][0], history.history["loss"][-1]),
    }


for result in ray.get([gpu_method.remote(20, seed) for seed in range(2)]):
    seen = result["tensorflow_gpus"]
    where = (
        f"TensorFlow saw {len(seen)} GPU(s): {seen}"
        if seen
        else "TensorFlow saw no GPU (tensorflow-cpu), so it trained on the CPU"
    )
    first, last = result["loss"]
    print(
        f"Task with GPUs {result['gpu_ids']} ran with "
        f"CUDA_VISIBLE_DEVICES={result['CUDA_VISIBLE_DEVICES']}; {where}; "
        f"loss {first:.3f} -> {last:.3f}"
    )

ray.shutdown()
