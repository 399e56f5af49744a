"""Actors: the ``@actor`` decorator, handles, and the actor process's call loop."""
