"""Pipeline code that diffusers does not ship: InstantID, matting (RMBG), condition images
(canny, depth, openpose), the face analyser and A1111-style prompt weighting. One readable file
each; tools compose them with diffusers' own pipelines.
"""
