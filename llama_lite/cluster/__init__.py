"""Past one machine (../../docs/cluster.md): batch jobs on Ray Data and replicas on Ray Serve. Ray is
an optional extra, imported only when one of these is used, never by `import llama_lite`."""

from .batch import BatchCompleter

__all__ = ["BatchCompleter"]
