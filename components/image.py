"""The container image every component runs in, and the decorator options all components share."""

import kd_lib

# The compiled pipeline names this image; `make image` builds it from the Dockerfile.
DEFAULT_IMAGE = f"kdflow:{kd_lib.__version__}"

# No pip at step start: the image already holds kd_lib, kfp and torch.
COMPONENT_OPTIONS = {"base_image": DEFAULT_IMAGE, "packages_to_install": [], "install_kfp_package": False}
