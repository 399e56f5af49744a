"""Actors: the decorator and its options, handles, the call codec, the local and Ray backends, the actor server, Weights, Queue, ActorPool."""
