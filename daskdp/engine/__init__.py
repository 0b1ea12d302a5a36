"""The engine on the worker: the plugin that holds it (`plugin`), loading and checking it
(`engine`), rows -> requests (`requests`), outputs -> rows (`rows`), and the one chunk loop (`loop`)."""
