"""The robot runtime (no torch), in two rooms: engine/ (model inference over a bundle) and control/
(the loop that turns a policy's actions into safe arm commands). molmoact_policy.py is the one
bridge between them."""
