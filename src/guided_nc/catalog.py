"""The names of the built-in datasets and backbones, in a module that imports nothing.

The command line lists them as ``--dataset`` / ``--model`` choices, so ``guided-nc --help``
must not import torchvision to learn them; :mod:`guided_nc.data` and :mod:`guided_nc.models`
take their lists from here.
"""

#: Names accepted by :func:`guided_nc.data.build_datasets`.
DATASET_NAMES = (
    "cifar10",
    "cifar100",
    "stl10",
    "imagenet",
    "mnist",
    "fashion-mnist",
    "digits",
    "mnist1d",
)

#: Names accepted by :func:`guided_nc.models.build_backbone`.
MODEL_NAMES = ("resnet18", "resnet50", "vgg13", "mlp", "cnn")

#: Names of the training losses (:func:`guided_nc.timing.build_loss`).
LOSSES = ("ce", "mse", "label-smoothing")

#: What ``dataset`` and ``model`` say when a run trains a user's own data or backbone
#: (:func:`guided_nc.train.train_model`).
CUSTOM = "custom"
