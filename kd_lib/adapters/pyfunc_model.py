"""Entry point of the registered MLflow pyfunc (models-from-code).

MLflow executes this file when ``models:/NAME@alias`` is loaded; it builds the wrapper from
code instead of unpickling one. Keep it this small.
"""

from mlflow.models import set_model

from kd_lib.adapters.serving import KdflowPyfunc

set_model(KdflowPyfunc())
