"""KNOWN as an MLflow pyfunc model, logged from this code file (MLflow "models from code"): loading it runs
this file and reads safetensors, nothing is unpickled.

    mlflow.pyfunc.load_model("models:/KNOWN@champion").predict(windows)

``windows`` is described in ``known.serving.predict_windows``. The version carries the code it predicts with
(``known.registry.PYFUNC_PACKAGE``, which MLflow puts on ``sys.path``), so it loads where this repository is
not installed and keeps predicting as it did when registered.
"""

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class KnownPyfunc(PythonModel):
    def load_context(self, context):
        from known_pyfunc import serving  # known.registry.PYFUNC_PACKAGE: the code logged with the version

        self.serving = serving
        self.models = serving.load_dir(context.artifacts["weights"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        return self.serving.predict_windows(self.models, model_input)


mlflow.models.set_model(KnownPyfunc())
