"""``c.MLflowService``: the settings of the platform's MLflow, a module of their own so that the hub and
``gpulab config`` read (and check) them without MLflow."""

from traitlets import List, Unicode
from traitlets.config import Configurable


class MLflowService(Configurable):
    """``c.MLflowService.*``: where the platform's MLflow keeps runs, artifacts and permissions."""

    backend_store_uri = Unicode(
        help="MLflow's --backend-store-uri: an SQLAlchemy URL (default sqlite:///<data dir>/mlflow/mlflow.sqlite)."
    ).tag(config=True)
    artifacts_destination = Unicode(
        help="MLflow's --artifacts-destination, served through the proxy (default <data dir>/mlflow/artifacts)."
    ).tag(config=True)
    socket = Unicode(
        help="The unix socket mlflow server listens on, in a directory made 0700 for this service's account "
        "alone (default run/mlflow.sock beside artifacts_destination)."
    ).tag(config=True)
    auth_database_uri = Unicode(
        help="Where MLflow keeps its users and permissions (default sqlite:///auth.sqlite beside "
        "artifacts_destination)."
    ).tag(config=True)
    jobs_api_url = Unicode(
        help="gpulab-jobs' API, where running jobs' tokens are checked (set by the hub; empty: jobs' tokens are "
        "refused)."
    ).tag(config=True)
    delegates = List(
        Unicode(),
        ["gpulab-infer"],
        help="Services that may act for a user (as:<user>:<admin>:<their hub token>), such as the inference "
        "gateway fetching a model it deploys for them.",
    ).tag(config=True)
