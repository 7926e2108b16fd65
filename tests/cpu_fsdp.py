"""`python tests/cpu_fsdp.py ARGS` runs `opdgeo ARGS` with accelerate's FSDP on CPU processes.

accelerate 1.15 turns an FSDP plugin on for accelerator devices only: `AcceleratorState`
sets `distributed_type = FSDP` when the processes are MULTI_GPU (or XPU, NPU, ...), and a
CPU run (MULTI_CPU, on gloo) drops the plugin without a word, so the Trainer trains it as
plain data parallel. torch's FSDP2 itself shards over gloo on CPU. This turns the plugin on
for CPU processes exactly as accelerate does for GPUs (the same four assignments); the
Trainer, accelerate's FSDP2 preparation, its saving and loading, and opdgeo are unchanged.
The tests launch it with torchrun, one process per GPU that a cluster job would have.
"""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from opdgeo.cli import main

    sys.exit(main(sys.argv[1:]))
