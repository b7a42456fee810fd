"""Data-parallel training over MPI (`mpiexec -n N npcpu train ...`): see npcpu.dist.trainer.

mpi4py is optional (`pip install 'npcpu[mpi]'`) and imported only by a run that uses it.
"""

from npcpu.dist.lm import DataParallelLanguageModelRunner, DataParallelLanguageModelTrainer
from npcpu.dist.trainer import DataParallelRunner, DataParallelTrainer
from npcpu.dist.world import World, abort_on_error, init_world

__all__ = ["DataParallelLanguageModelRunner", "DataParallelLanguageModelTrainer",
           "DataParallelRunner", "DataParallelTrainer", "World", "abort_on_error", "init_world"]
