"""KNOWN as an MLflow pyfunc model, logged from this code file (MLflow "models from code"): loading it runs
this file and reads safetensors, nothing is unpickled.

    mlflow.pyfunc.load_model("models:/KNOWN@champion").predict(windows)

``windows`` is described in ``known.registry.predict_windows``.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class KnownPyfunc(PythonModel):
    def load_context(self, context):
        from known import registry

        self.models = registry.load_dir(context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        from known import registry

        return registry.predict_windows(self.models, model_input)


mlflow.models.set_model(KnownPyfunc())
