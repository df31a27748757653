/*
 * Import wsi-dala results into the open image and show tumour probability as a measurement map.
 *
 * Run from QuPath's script editor (Automate > Script editor) with the slide open: it asks for the run
 * folder that `wsi-dala run` printed. Or pass the folder as the script's argument, e.g. headless in a
 * project, saving the objects with the image:
 *     QuPath script -p project.qpproj -s -a /path/to/run import_wsi_dala.groovy
 * The script reads the folder's run.json and imports exactly the files it lists:
 * <slide>.tiles.geojson[.gz] (tiles, as detections with measurements), <slide>.tumour.geojson[.gz]
 * (tumour regions, as annotations) and <slide>.slide.geojson[.gz] (the tissue, as one annotation carrying
 * the slide-level answer), never other GeoJSON lying there. It then colours the tiles by
 * "Tumor probability" over the fixed range 0-1 with Inferno, the colour map of wsi-dala's overlay.png
 * (QuPath would otherwise stretch the map to the data's min-max). Written for QuPath 0.4-0.6.
 */
import groovy.json.JsonSlurper
import qupath.lib.gui.dialogs.Dialogs
import qupath.lib.gui.tools.MeasurementMapper

def measurement = 'Tumor probability'
def colorMapName = 'Inferno'   // the same map as overlay.png (wsi_dala/outputs/overlay.py)

def given = binding.hasVariable('args') && args ? args[0] as String : null
def folder = given ? new File(given) : Dialogs.promptForDirectory('wsi-dala run folder', null)
if (folder == null) {
    println 'No folder chosen'
    return
}
def record = new File(folder, 'run.json')
if (!record.isFile()) {
    println "No run.json in ${folder}: not a wsi-dala run folder"
    return
}
def run = new JsonSlurper().parse(record)
if (run.status != 'complete') {
    println "The run in ${folder} is not complete (status: ${run.status}); run wsi-dala again first"
    return
}
// The run must be of the image open here: its coordinates are that slide's pixels. Given a folder as the
// argument (headless, perhaps over every image of a project), other images are skipped; chosen by hand,
// a different name is only reported (a slide may have been renamed or converted).
def slideName = new File(run.slide.path as String).name
def slideStem = slideName.contains('.') ? slideName.substring(0, slideName.lastIndexOf('.')) : slideName
def imageName = getProjectEntry()?.getImageName() ?: getCurrentServer()?.getMetadata()?.getName()
if (imageName != null && !imageName.startsWith(slideStem)) {
    if (given) {
        println "Skipping ${imageName}: the run in ${folder} is of ${slideName}"
        return
    }
    println "Warning: the open image is ${imageName}, the run in ${folder} is of ${slideName}"
}
// Only file names inside this folder (never a path read from a file).
// slide_geojson (the whole-tissue annotation with the slide answer) is absent from runs of older releases.
def listed = ['tiles_geojson', 'tumour_geojson', 'slide_geojson'].findAll { run.outputs[it] != null }
def files = listed.collect { new File(folder, new File(run.outputs[it] as String).name) }
def missing = files.findAll { !it.isFile() }
if (!missing.isEmpty()) {
    println "Missing from ${folder}: ${missing*.name}"
    return
}
files.each { file ->
    println "Importing ${file.name}"
    importObjectsFromFile(file.absolutePath)
}

def viewer = getCurrentViewer()
if (viewer == null) {
    println 'Objects imported; open the image in a viewer to see the measurement map.'
    return
}
def colorMapper = MeasurementMapper.loadColorMappers().find { it.name == colorMapName }
def mapper = new MeasurementMapper(colorMapper, measurement, getDetectionObjects())
mapper.setDisplayMinValue(0.0)
mapper.setDisplayMaxValue(1.0)
viewer.getOverlayOptions().setMeasurementMapper(mapper)
viewer.getOverlayOptions().setFillDetections(true)
println "Measurement map: ${measurement} (0-1, ${colorMapName})"
