"""TensorBoard loader and routes for the "gradients" plugin (the entry-point module: imports nothing heavy)."""

from __future__ import annotations

from tensorboard.plugins import base_plugin

from . import format as fmt


class GradientsPlugin(base_plugin.TBPlugin):
    plugin_name = fmt.PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._context = context

    def get_plugin_apps(self) -> dict:
        return {}

    def is_active(self) -> bool:
        return False

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Gradients")


class GradientsLoader(base_plugin.TBLoader):
    def load(self, context: base_plugin.TBContext) -> GradientsPlugin:
        return GradientsPlugin(context)
