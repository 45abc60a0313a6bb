"""Built-in sink and source plugins, registered through entry points like third-party ones."""
