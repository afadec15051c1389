"""OmniPose Serve: multi-person 2D pose estimation, from training to a production service.

The repository keeps one folder per part (``model/``, ``service/``, ``training/``, ``cli/``,
``proto/``); the package build maps each under this one import name, so installing the project
adds a single top-level package and cannot collide with a user's own ``model`` or ``service``:

* :mod:`omnipose.model` - the network, checkpoints, crops, heatmap codec and the predictor;
* :mod:`omnipose.service` - the REST and gRPC service around it;
* :mod:`omnipose.training` - recipes, data, training and evaluation;
* :mod:`omnipose.cli` - the ``omnipose`` command;
* :mod:`omnipose.proto` - the generated gRPC stubs of ``proto/omnipose.proto``.
"""
