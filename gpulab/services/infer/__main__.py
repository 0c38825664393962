from .app import InferApp

InferApp.launch_instance()
