# An image that holds nothing but wheels, for the main Dockerfile's TORCH_WHEELS build argument: the torch layer
# bind-mounts it and hands it to pip with --find-links, so a wheel already on disk is not downloaded again.
#   docker build -t torch-wheels -f docker/wheels.Dockerfile /path/to/wheel/folder
# (the build context is the wheel folder; only its *.whl files are copied).
FROM scratch
COPY *.whl /
