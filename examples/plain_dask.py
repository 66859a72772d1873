"""Plain Dask with dask_gpuresources: declared GPUs become device ids inside tasks.

Runs on any machine: the local cluster declares 4 GPUs (no real GPU needed). On a real
cluster the same code runs against ``dask scheduler --preload dask_gpuresources`` and
``dask worker ... --resources GPU=4``.

    python examples/plain_dask.py
"""

from __future__ import annotations

import time

import dask
from distributed import Client, LocalCluster

import dask_gpuresources as gr


def train(step: int) -> tuple[int, list[int]]:
    time.sleep(0.2)  # stands for work on the devices this task owns
    return step, gr.get_gpu_ids()


def main() -> None:
    # One machine with 4 GPUs; 8 threads so that 4 GPU tasks and CPU work run together.
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=8, resources={"GPU": 4}, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        gr.install(client)

        for step, ids in client.gather(client.map(train, range(8), resources={"GPU": 1})):
            print(f"step {step}: this task owns GPU {ids}")

        with dask.annotate(resources={"GPU": 0.25}):
            shared = [dask.delayed(train)(i, dask_key_name=f"quarter-{i}") for i in range(4)]
        print(
            "four GPU=0.25 tasks packed on one device:",
            sorted({tuple(ids) for _, ids in dask.compute(*shared, optimize_graph=False)}),
        )

        print(
            "two devices for one task:",
            client.submit(train, 0, resources={"GPU": 2}, pure=False).result()[1],
        )

        try:
            client.submit(train, 0, resources={"GPU": 5}, pure=False).result()
        except gr.InfeasibleRequestError as e:
            print("asking for 5 GPUs fails at once:", e)

        print("allocations:", gr.allocations(client))


if __name__ == "__main__":
    main()
