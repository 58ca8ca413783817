from torch.utils._python_dispatch import TorchDispatchMode


class Ops(TorchDispatchMode):
    """The names of the aten ops run inside it, in order (`seen`)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))
