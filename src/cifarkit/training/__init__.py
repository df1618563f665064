"""Training a network: ``train(cfg)`` runs a recipe end to end (see loop.py for the story of a run).

    prep.py       device, data and split, the network, native kernels  -> Prepared
    loader.py     the batches: order, augmentation, progressive size, DDP slice
    selective.py  selective backprop (the network or a proxy ranks each batch)
    state.py      TrainState: what last.ckpt holds and a resume restores
    writer.py     the run folder: metrics, TensorBoard, checkpoints, summary
    loop.py       train() and train_one_epoch()
"""
from .loader import Loader, epoch_size
from .loop import fit, make_loss, train, train_one_epoch
from .prep import Prepared, prepare

__all__ = ["Loader", "Prepared", "epoch_size", "fit", "make_loss", "prepare", "train", "train_one_epoch"]
