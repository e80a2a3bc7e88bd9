"""pipeserve: Hugging Face pipeline inference over gRPC, with native PyTorch model families.

The generated contracts, `pipeserve.v1`, are not in this folder: the pipeserve-client
distribution ships them (clients/python/pipeserve/v1, generated when it is built), so a
caller installs them without torch. Installed from wheels, both land in one site-packages
folder; in a source checkout or editable install they are two folders, and extend_path joins
every `pipeserve` folder on sys.path into this package's search path.
"""
from pkgutil import extend_path

from pipeserve_client._version import __version__

__path__ = extend_path(__path__, __name__)
