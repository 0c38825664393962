from .app import JobsApp

JobsApp.launch_instance()
