"""The model repository: versions on disk (repository), the versions a server holds (registry), a CLI."""
